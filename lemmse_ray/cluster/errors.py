"""Errors of work on the cluster, importable without Ray (the CLI catches them; ``lemmse report`` runs where Ray
is not installed)."""


class ClusterError(RuntimeError):
    """The cluster cannot run the work as asked (resources busy past a bounded wait, an actor that failed for
    good); the CLI prints it on one line."""
