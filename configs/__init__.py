"""The bundled configs, shipped inside the wheel as `vlmixer.configs`.

`detector/` holds detectron2 C4 detector configs (the VinVL X152-C4 and bottom-up-attention
R101-C4 references, and a tiny one for tests and the demo); `pretrain/` holds trainer configs
(VLMixer, and the ALBEF / TCL / X-VLM objectives on paired data). `--config` takes a path or
one of their names, as detectron2's model zoo resolves its configs; `vlmixer config list`
shows them.
"""
