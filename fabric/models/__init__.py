"""Models: what a model directory holds, and the embedded presets made offline.

    config   ModelConfig: a Hugging Face ``config.json`` (Llama architecture), validated, and
             the KV geometry it gives the block manager
    presets  ``tiny`` and ``small``: a random Llama and a byte-level BPE tokenizer trained on
             ``corpus.txt``, made deterministically on first use (``ensure_model``; imports torch)

``python -m fabric.models [tiny|small]`` makes a preset and prints its directory. Below the
engine and the frontend, which both read models; imports ``fabric.kvbm`` (for ``KvGeometry``)
and ``fabric.errors`` only. Import from the modules: this package imports nothing, so that
reading a ``ModelConfig`` never loads torch.
"""
