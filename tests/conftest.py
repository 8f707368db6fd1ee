"""Shared fixtures: the real data folder (../shared/data or $ETC_DATA_SHARED) and small real batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported: deletes hang otherwise


def shared_data_dir() -> Path | None:
    for cand in (os.environ.get("ETC_DATA_SHARED"), ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        if cand and (Path(cand) / "cifar10-lossless-subset.npz").exists():
            return Path(cand)
    return None


SHARED = shared_data_dir()


def fixed_owner():
    """An owner key with a fixed secret, for tests that write manifests directly (not through prepare)."""
    from etc_data.keys import OwnerKey

    return OwnerKey("tests", bytes(range(32)))
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data is absent (real-data tests)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if SHARED is None:
        pytest.skip("../shared/data is absent")
    return SHARED


@pytest.fixture(scope="session")
def cifar_exact(shared_dir):
    """The 5,000 exact-pixel CIFAR-10 images: dict with x_train, y_train, x_test, y_test."""
    with np.load(shared_dir / "cifar10-lossless-subset.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def imagenette_batch(shared_dir):
    """32 real Imagenette images at 224x224 (decoded from the shared zip)."""
    import zipfile

    from etc_data.images import decode_image

    with zipfile.ZipFile(shared_dir / "imagenette-224-subset.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".JPEG"))[::120][:32]
        return np.stack([decode_image(z.read(n), n) for n in names])


@pytest.fixture
def key_file(tmp_path):
    from etc_data.keys import new_key_file

    path = tmp_path / "owner.key"
    new_key_file(path, "alice")
    return path


@pytest.fixture(scope="session", autouse=True)
def _prefect_home(tmp_path_factory):
    """Prefect's home (ephemeral API database, settings) in a temporary folder per test session."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    yield


@pytest.fixture(scope="session")
def prefect_home_template(tmp_path_factory):
    """A Prefect home whose database was created and migrated once in this test session: Prefect's
    API server boots on a fresh home in ~15 s here, on a migrated copy in ~5 s. Copy it with
    ``fresh_prefect_home``; nothing of a test's own run is in it."""
    from etc_data.cli.ephemeral import EphemeralAPI

    home = tmp_path_factory.mktemp("prefect-template")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    api = EphemeralAPI()
    try:
        api.wait(timeout=300)
    finally:
        api.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return home


@pytest.fixture
def fresh_prefect_home(tmp_path, prefect_home_template):
    """A new Prefect home for one test, already migrated."""
    import shutil

    home = tmp_path / "prefect-home"
    shutil.copytree(prefect_home_template, home)
    return home


@pytest.fixture(scope="session")
def prefect_in_process(prefect_home_template):
    """Prefect used in this pytest process (its ephemeral server starts on first use) on the
    session's home, seeded with the migrated template database."""
    import shutil

    home = os.environ["PREFECT_HOME"]
    if not os.path.exists(os.path.join(home, "prefect.db")):
        shutil.copytree(prefect_home_template, home, dirs_exist_ok=True)
    return home


def make_image_zip(path: Path, images, labels, classes, split: str = "train", ext: str = "png") -> Path:
    """Write real images into a ``<split>/<class>/NNNN.<ext>`` zip (what the shared copies look like)."""
    import io
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(path, "w") as z:
        for i, (img, lab) in enumerate(zip(images, labels)):
            b = io.BytesIO()
            Image.fromarray(img).save(b, format="PNG" if ext == "png" else "JPEG", quality=95)
            z.writestr(f"{split}/{classes[int(lab)]}/{i:04d}.{ext}", b.getvalue())
    return path


def make_mini_npz(path: Path, cifar_exact: dict, n_train: int, n_test: int = 0) -> Path:
    """An .npz source of the first exact CIFAR-10 images (x_/y_train, and x_/y_test when n_test)."""
    arrays = {"x_train": cifar_exact["x_train"][:n_train], "y_train": cifar_exact["y_train"][:n_train]}
    if n_test:
        arrays.update(x_test=cifar_exact["x_test"][:n_test], y_test=cifar_exact["y_test"][:n_test])
    np.savez(path, **arrays)
    return path
