"""SmolLM corpus / jsonl -> Megatron-core indexed shards (``lm2-preprocess``).

Modules: ``readers`` (input discovery, streaming tasks, row validation), ``encode`` (worker-side
batch encoding), ``shards`` (token-budget shards, atomic commit, resume state), ``pipeline``
(worker pool, MPI ranks), ``manifest`` (manifest.json; ``load_manifest``), ``blend`` (blend.json;
``load_blend``), ``cli`` (``main``). See docs/preprocess.md.
"""
