"""`flaxbert convert`: HuggingFace BERT directories into flaxbert checkpoints and back.

Import (`--from-hf DIR --workdir OUT`) reads a local HuggingFace BERT directory:
`config.json`, the weights (`model.safetensors`, a sharded `model.safetensors.index.json`,
or `flax_model.msgpack`) and the WordPiece `vocab.txt`. The weights may be a
BertForPreTraining (`bert.*`, `cls.predictions.*`, `cls.seq_relationship.*`), a
BertForMaskedLM (no pooler, no NSP head) or a bare BertModel (the encoder only, with or
without its pooler, names without `bert.`); the model built on it
(`flaxbert.pretraining_model.BertForPreTraining.for_params`) has exactly those heads. A fine-tuned
model's task head (`classifier.*` of a BertForSequenceClassification) is refused, naming its
weights, unless `--drop-unknown` leaves it out. Safetensors hold PyTorch names and (out, in)
kernels, msgpack Flax names and (in, out) kernels. The vocabulary is `vocab.txt`, or the
SentencePiece `tokenizer.model` that an export of a SentencePiece checkpoint writes, so that
every flaxbert export imports back. OUT becomes a workdir like `flaxbert pretrain` leaves
it: `checkpoints/0/` (parameters and meta), `vocab.txt` and `tokenizer_config.json`, so that
`flaxbert finetune --config.init_from=OUT` and `flaxbert extract-features --workdir OUT`
take it as they take a pre-training run.

Special ids. flaxbert fixes [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 (`flaxbert.tokenizer`);
HuggingFace's English BERT vocabularies have them at 0, 100, 101, 102, 103. The import moves
the five to the front and keeps every other piece in its original order: one permutation
(`vocabulary_order`) applied to the rows of the word embeddings, to the MLM output bias and
to the lines of OUT/vocab.txt, so the tokenizer reads flaxbert ids straight from the file.
The five original ids are kept in OUT/tokenizer_config.json (`flaxbert_original_ids`), and
the export puts every row and line back where it came from, bit for bit.

Export (`--to-hf WORKDIR --out DIR`) writes the encoder of a flaxbert checkpoint (scanned or
not) and, when the checkpoint has them, the MLM and NSP heads as `model.safetensors`
(PyTorch names and layouts), `config.json` (model_type bert, hidden_act gelu), and the
tokenizer: `vocab.txt` + `tokenizer_config.json` for WordPiece, or the SentencePiece
`tokenizer.model`, which HuggingFace's BertTokenizer cannot read.

Modules: `names` (which HuggingFace weight each parameter is, and the heads present),
`params` (weights <-> parameter tree, the vocabulary permutation), `hf_config`
(config.json <-> `BertConfig`), `hf_io` (the files of a HuggingFace directory),
`hf_import`, `hf_export` and `cli` (the command).
"""

from flaxbert.convert.cli import add_convert_parser, run_convert
from flaxbert.convert.common import ConversionError
from flaxbert.convert.hf_config import hf_config_from_bert
from flaxbert.convert.hf_export import export_hf, read_params
from flaxbert.convert.hf_import import import_hf
from flaxbert.convert.names import BUFFERS, TIED_DECODER
from flaxbert.convert.params import params_to_hf, vocabulary_order

__all__ = [
    "BUFFERS",
    "TIED_DECODER",
    "ConversionError",
    "add_convert_parser",
    "export_hf",
    "hf_config_from_bert",
    "import_hf",
    "params_to_hf",
    "read_params",
    "run_convert",
    "vocabulary_order",
]
