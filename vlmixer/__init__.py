"""vlmixer: unpaired vision-language pre-training with Cross-Modal CutMix (VLMixer, ICML 2022).

One import name for the whole product, in layers that import only downward: the ground
(`errors`, `config`, `files`, the bundled `configs`), then `storage` (the store formats), then
`pipeline` (the batch jobs) and `trainer` (the method), then `cli` and `demo`. This module
imports nothing, so `import vlmixer.storage` costs only what storage needs.
"""
