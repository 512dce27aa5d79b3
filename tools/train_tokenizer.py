#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) from .jsonl / .txt files, streaming the input.

Example::

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --json-key text --model-prefix tok \\
        --vocab-size 32000 --model-type bpe --special-tokens '<mask>,<pad>,<eod>' --sample-size 2000000

Lines are fed to the trainer through an iterator; ``--sample-size`` caps how many lines are kept (reservoir
sampling over the stream with ``--seed``), so memory does not grow with the corpus and the same input and seed
give the same tokenizer.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
