"""The AR probe: is a tokenizer's token language generatable? A small decoder-only transformer trained
with next-token cross-entropy on token shards (GigaTok's AR probing, Xiong et al. 2025,
https://arxiv.org/abs/2504.08736), reporting held-out bits per token against the unigram entropy,
samples decoded by the tokenizer, and gFID. Entry point: ``probe.py`` (``imagetok.cli.probe``)."""
