"""Command-line entry points. Each module holds one ``@hydra.main`` over the config tree that ships
inside the package (``imagetok/configs``; the repository's top-level ``configs`` is a link to it), so the
tools run the same from a clone (``python train.py``), as console scripts (``imagetok-train``) or as
modules (``python -m imagetok.cli.train``). A directory of one's own configs joins the search path with
``--config-dir DIR`` (or ``hydra.searchpath=[file:///DIR]``): its files add options to the groups, or
replace ours where the names are the same."""
