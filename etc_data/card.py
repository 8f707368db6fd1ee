"""The dataset card: ``ROOT/README.md``, for people and for Hugging Face ``datasets``.

``datasets.load_dataset(ROOT)`` reads the card's YAML front matter: one ``default`` config whose
``data_files`` name, per split, exactly the shards its manifest lists (never a ``*.tar`` glob, which
would also count a leftover shard of a killed run), and the features: the image column (named by
the codec's extension, an ``image`` where Pillow decodes the codec, raw ``binary`` otherwise),
``cls`` as a class label with the class names, the ``json`` metadata, and webdataset's ``__key__``
and ``__url__``; ``splits`` holds the sample counts, which ``datasets`` checks while it loads.

The text below the front matter says what the data is and how it was made: owner key fingerprint
and the owner's public key (every manifest read here is signed and carries it), scheme, block
size, codec, counts and sample order, how to read and train on it, and the security caveat. It is
rewritten from the committed manifests of every split once a prepare run has committed, so it describes
what the manifests say. Nothing secret is in it: manifests carry none.
"""

from __future__ import annotations

import json

from .errors import EtcError
from .manifest import Manifest, read_info, read_manifest
from .readers import WIDS_SUFFIX, pillow_decodable
from .storage import join, write_bytes

CARD_NAME = "README.md"
SPLIT_ORDER = ("train", "validation", "valid", "val", "test")
JSON_FEATURES = [{"name": "cls", "dtype": "int64"}, {"name": "source_id", "dtype": "string"},
                 {"name": "split", "dtype": "string"}]


def image_field(m: Manifest) -> str:
    from .codecs import get_codec

    return get_codec(m.codec).ext


def features(m: Manifest) -> list[dict]:
    """The Hugging Face features of a split's samples, in the order the webdataset builder yields them."""
    ext = image_field(m)
    return [{"name": ext, "dtype": "image" if pillow_decodable(m.codec) else "binary"},
            {"name": "cls", "dtype": {"class_label": {"names": {str(i): c for i, c in enumerate(m.classes)}}}},
            {"name": "json", "struct": JSON_FEATURES},
            {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def front_matter(manifests: dict[str, Manifest]) -> dict:
    """One ``default`` config over every split; splits whose features differ (another codec or
    class list, from separate runs) get one config each, named after the split."""
    m0 = next(iter(manifests.values()))
    same = all(features(m) == features(m0) for m in manifests.values())
    groups = {"default": manifests} if same else {s: {s: m} for s, m in manifests.items()}
    configs = [{"config_name": name, "data_files": [{"split": s, "path": [f"{s}/{n}" for n in m.filenames]}
                                                    for s, m in group.items()]} for name, group in groups.items()]
    infos = [{"config_name": name, "features": features(next(iter(group.values()))),
              "splits": [{"name": s, "num_bytes": 0, "num_examples": m.num_samples} for s, m in group.items()],
              "download_size": sum(m.num_bytes for m in group.values())}
             for name, group in groups.items()]
    return {"pretty_name": f"{m0.dataset} ({m0.scheme}-encrypted)", "task_categories": ["image-classification"],
            "tags": ["etc-data", "webdataset", "encrypted", f"scheme-{m0.scheme}"],
            "configs": configs, "dataset_info": infos[0] if same else infos}


def _summary(manifests: dict[str, Manifest]) -> str:
    m0 = next(iter(manifests.values()))
    ext = image_field(m0)
    rows = "\n".join(f"| {s} | {m.num_samples} | {len(m.shards)} | {m.num_bytes / 1e6:.1f} | "
                     f"`{m.scheme}` {m.block_size} | `{m.codec}` |" for s, m in manifests.items())
    order = m0.sample_order or {}
    order_text = (f"seeded shuffle (seed from {', '.join(order.get('seed_from', []))}): a plain sequential read "
                  f"already mixes the classes" if order.get("shuffle") == "seeded" else "sorted by sample key")
    decoder = ("Pillow-based readers (timm, Hugging Face `datasets`, torchvision) decode it"
               if pillow_decodable(m0.codec) else
               "Pillow-based readers (timm, Hugging Face `datasets`, torchvision, DALI) can NOT decode it: use "
               "`etc_data.readers.etc_data_handler`")
    scheme_opts = json.dumps(m0.scheme_options, sort_keys=True) if m0.scheme_options else "none"
    return f"""# {m0.dataset}: encrypted image dataset (etc-data)

Images encrypted block-wise with the owner's key (`{m0.scheme}`), compressed and sharded as
WebDataset tars by `etc-data prepare`. Models train on the encrypted images
directly; nobody who trains needs the key.

| split | samples | shards | MB | scheme, block | codec |
|---|---|---|---|---|---|
{rows}

- **Owner key fingerprint**: `{m0.key_fingerprint or "none (scheme plain)"}`
- **Owner public key**: `{m0.public_key}`
- **Scheme**: `{m0.scheme}`, block size {m0.block_size}, options {scheme_opts}, padding `{m0.pad}`
- **Codec**: `{m0.codec}` (samples `<key>.{ext}`); {decoder}
- **Image size**: {m0.image_size[0]} x {m0.image_size[1]}; **classes** ({len(m0.classes)}): {", ".join(m0.classes)}
- **Sample order**: {order_text}
- **Samples**: `<key>.{ext}` (encrypted image), `<key>.cls` (label index), `<key>.json`
  (`cls`, `source_id`, `split`)

## Files

- `<split>/manifest.json`: the split's manifest, the commit point: shard names, sizes, sha256 and
  sample counts. Only the shards it lists belong to the dataset; check them with
  `etc-data verify ROOT`.
- `<split>/<split>-NNNNNN.tar`: the shards; `<split>/<split>{WIDS_SUFFIX}`: wids descriptor;
  `_info.json`: timm's `wds/` reader; this card: Hugging Face `datasets.load_dataset(ROOT)`.

## Reading and training

```python
import webdataset as wds
from etc_data.readers import etc_data_handler
ds = wds.WebDataset(["ROOT/{next(iter(manifests))}/{m0.filenames[0]}"], shardshuffle=False).decode(etc_data_handler).to_tuple("{ext}", "cls")
```

```bash
etc-data train --shards ROOT/train --test-shards ROOT/test --model convmixer --out runs/x
```

With timm's `train.py` (`--dataset wds/{m0.dataset} --data-dir ROOT`), keep the encrypted pixels
intact: `--scale 1 1 --ratio 1 1 --hflip 0 --color-jitter 0 --crop-pct 1.0` and no other
augmentation; a model trained on this data only works on images encrypted with the same key,
scheme and block size. See etc-data's `docs/reading.md` for every reader.

## Security caveat

Block-wise learnable encryption hides what images show from a casual viewer; it is not
encryption in the cryptographic sense. None of these schemes has a proof of security, the images
leak structure (edges inside blocks, block statistics), and with large blocks on small images
(EtC, block 16, 32 x 32 px: a 30.9-bit key space) puzzle solvers recover many images. Share this
dataset only with parties you would trust with the plain images' statistics. See etc-data's
`docs/security.md` for the measured leakage.
"""


def dataset_card(manifests: dict[str, Manifest]) -> str:
    """The card's text: YAML front matter for ``datasets``, then the summary."""
    import yaml

    head = yaml.safe_dump(front_matter(manifests), sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n{_summary(manifests)}"


def committed_splits(root: str, storage_options: dict | None = None, trust=None) -> dict[str, Manifest]:
    """The manifests of every split the root's ``_info.json`` lists that is committed and signed by
    a signer ``trust`` (a ``trust.TrustPolicy``; None: the first split's signer) accepts."""
    from .trust import TrustPolicy

    trust = trust or TrustPolicy()
    out = {}
    listed = (read_info(root, storage_options) or {}).get("splits") or {}
    for split in sorted(listed, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s)):
        try:
            out[split] = read_manifest(join(root, split), storage_options, trust)
            trust = trust.after_first_use(out[split].public_key)
        except EtcError:
            continue  # listed but not (or no longer) readable: the card describes what is committed
    return out


def write_dataset_card(root: str, storage_options: dict | None = None, trust=None) -> str | None:
    """(Re)write ``ROOT/README.md`` from the committed manifests ``trust`` accepts; its URL, or None
    without any."""
    manifests = committed_splits(root, storage_options, trust)
    if not manifests:
        return None
    url = join(root, CARD_NAME)
    write_bytes(url, dataset_card(manifests).encode(), storage_options)
    return url
