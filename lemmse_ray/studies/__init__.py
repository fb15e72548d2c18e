"""Studies: specs and presets, the engine that computes every cell once, the analyses, figures and the report;
and the scaling study of the estimate step.
"""
