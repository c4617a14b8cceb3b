"""What mla-passes knows about vLLM, in one subpackage.

* :mod:`.tables` - one table per supported vLLM release: the MLA ops' names
  and schemas, the attention arguments the prepped-q path does not model,
  where vLLM keeps its pass context. Everything else reads these; supporting
  the next release means adding its table (and running its tests);
* :mod:`.compat` - the version gate and what is read from vLLM's internals
  (layer state, the prepped-q attention adapter, the composed post-grad pass);
* :mod:`.patches` - every change made to vLLM's own classes;
* :mod:`.plugin` - the entry points vLLM calls (``vllm.general_plugins``,
  ``vllm.platform_plugins``).

Importing this package (or :mod:`.tables`) never imports vLLM: the passes
read the tables in processes without it. Inside this subpackage ``import
vllm`` is vLLM itself (imports are absolute).
"""
