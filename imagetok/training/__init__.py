"""Lightning training: module, EMA, callbacks, run.train."""
