"""Pipeline steps 1-2: the text corpus and probing data (stage corpus), the language model,
activation extraction and its shards (stage extract)."""
