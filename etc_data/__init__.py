"""etc-data: share image datasets for training without revealing them.

Block-wise encryption-then-compression (EtC) and related learnable encryption schemes, codecs and
size reports, WebDataset shards with manifests, a streaming trainer and model encryption.
Pure functions over numpy batches; heavy imports (torch, timm) only in the modules that need them.
"""

__version__ = "0.1.0"
