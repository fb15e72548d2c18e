"""The networks compared with the LE-MMSE (PatchMLP, ResNet, U-Net); each builds itself from a configuration.
"""
