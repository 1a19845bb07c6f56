"""Converters from common data formats to mmdistill sample records, and the shard writing they share.

Each ``from_*`` function yields sample dicts (see :mod:`mmdistill.shards` for the record); the
``python -m data_tools`` subcommands write them as shards with :func:`write_shards`. Every
converter

* is deterministic: the same input gives the same samples in the same order, so the same shards
  byte for byte;
* never drops a record silently: a bad one raises a one-line :class:`ConvertError` naming the
  file and line (or row, or record id); with ``BadRecords("skip")`` it is skipped and counted;
* stamps ``split``, ``domain`` and ``stage`` (default 0) on every sample, overriding the source.

Sources:

* chat JSONL (:func:`from_chat_jsonl`): ShareGPT ``{"conversations": [{"from", "value"}]}`` or
  OpenAI ``{"messages": [{"role", "content"}]}`` lines;
* LLaVA JSON (:func:`from_llava_json`): a list of ``{"id", "image", "conversations"}`` with
  ``<image>`` placeholders;
* a Hugging Face dataset saved with ``save_to_disk``, or parquet (:func:`from_hf_disk`);
* reasoning-gym tasks (:func:`from_reasoning_gym`), with worked solutions for
  :data:`REASONING_GYM_WITH_SOLUTIONS`;
* the procedural scenes task (:func:`from_scenes`, :func:`write_scenes_suite`).

The ``datasets`` and ``reasoning-gym`` packages are optional (``pip install 'mmdistill[data]'``);
only the converters that need them import them.
"""
