#!/usr/bin/env python
"""Tokenize .jsonl/.jsonl.gz corpora into Megatron-LM MMIDIDX files, with Megatron's flags.

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/my \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8

writes ``data/my_text_document.bin/.idx`` (and ``.stats.json``). ``--append-eod`` appends the id Megatron-LM's
own preprocess_data.py appends for the same tokenizer: its eos (sentencepiece ``eos_id()``, Hugging Face
``eos_token_id``, GPT-2 ``<|endoftext|>``; a Hugging Face vocabulary without eos: its sep). ``--eod-token
PIECE_OR_ID`` (with ``--append-eod``) appends another piece or id instead, e.g. ``--eod-token '<eod>'``;
Megatron's legacy SentencePieceTokenizer type adds an ``<EOD>`` beyond the vocabulary, matched only by a
tokenizer trained with that piece and ``--eod-token '<EOD>'``. The id used is recorded as ``eod_token_id`` in
the ``.stats.json`` sidecar. ``--help`` prints the rule; see ``megatron_ki/data/preprocess.py`` for the design.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
