"""Special tokens at the fixed ids every flaxbert vocabulary uses.

SentencePiece models trained by `flaxbert train-tokenizer` put these pieces at these ids;
the embedded synthetic corpus uses the same ids, so data, model and heads agree.
"""

PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3
MASK_ID = 4
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_SPECIAL = len(SPECIAL_TOKENS)
