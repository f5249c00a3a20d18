"""The special tokens every flaxbert vocabulary holds at fixed ids: [PAD]=0 [UNK]=1 [CLS]=2
[SEP]=3 [MASK]=4. SentencePiece models trained by `flaxbert train-tokenizer` put these pieces
at these ids, WordPiece vocabularies are reordered to them by `flaxbert convert`, and the
embedded synthetic corpus uses the same ids, so data, model and heads agree.
"""

PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3
MASK_ID = 4
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_SPECIAL = len(SPECIAL_TOKENS)
