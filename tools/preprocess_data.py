#!/usr/bin/env python
"""Tokenize .jsonl/.jsonl.gz corpora into Megatron-LM MMIDIDX files, with Megatron's flags.

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/my \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8

writes ``data/my_text_document.bin/.idx``. See ``megatron_ki/data/preprocess.py`` for the design.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
