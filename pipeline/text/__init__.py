"""The text job: corpora -> tagged, word-piece tokenised sentences in the HDF5 text store.

Stages, one module each:
  corpus.py       input formats (txt, jsonl, tsv, COCO captions) cut into shards with stable
                  names; bad lines become counted reasons, never exceptions
  spacy_model.py  which spaCy pipeline, loaded once per process (tagger + lemmatizer only)
  attribute_rules.py  exact, faster stand-ins for spaCy's attribute ruler matching and
                  lemmatizer loop (self-checked against the real pipeline at load)
  gemm.py         the network's matrix products on numpy's BLAS, one thread (self-checked)
  resolve.py      user arguments -> concepts (file or gallery), mapping, checked up front
  concepts.py     the word -> concept mapping (explicit, TSV) and the longest-match matcher
  synonyms.py     WordNet synonyms for that mapping, versioned, with a stop-list
  wordpiece.py    the word-piece tokenizer (BERT uncased by default), resolved offline
  tagger.py       one batch of records -> tagged sentences (spaCy, matcher, word-pieces)
  job.py          the sharded, resumable job: a plain shard callable, run in-process or on Ray
  render.py       `text show` and `text dump` renderings of a store
"""
