"""etc-data: share image datasets for training without revealing them.

Block-wise encryption-then-compression (EtC) and related learnable encryption schemes, codecs and
size reports, WebDataset shards with manifests, a streaming trainer and model encryption.

One public function per job, each taking one config object (the CLI parses arguments into that
object; a Prefect flow in ``etc_data.flows`` wraps the same call in tasks):

=====================  ======================  ===================  ======================
job                    function                config               module
=====================  ======================  ===================  ======================
prepare a dataset      ``prepare_dataset``     ``PrepareConfig``    ``etc_data.prepare``
verify a dataset       ``verify_dataset``      ``VerifyConfig``     ``etc_data.verify``
encrypt a folder       ``encrypt_folder``      ``FolderConfig``     ``etc_data.folders``
decrypt a folder       ``decrypt_folder``      ``FolderConfig``     ``etc_data.folders``
size report            ``size_report``         ``ReportConfig``     ``etc_data.report``
train                  ``train_model``         ``TrainConfig``      ``etc_data.train``
evaluate               ``evaluate_checkpoint``  ``EvalConfig``       ``etc_data.evaluate``
encrypt a model        ``encrypt_model``       ``ModelCryptConfig`` ``etc_data.modelcrypt``
audit                  ``audit_schemes``       ``AuditConfig``      ``etc_data.audit``
=====================  ======================  ===================  ======================

They are imported lazily, so ``import etc_data`` stays light: numpy, torch and timm load only
with the job that needs them. Nothing in the library imports Prefect.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "prepare_dataset": "prepare", "PrepareConfig": "prepare",
    "verify_dataset": "verify", "VerifyConfig": "verify",
    "encrypt_folder": "folders", "decrypt_folder": "folders", "FolderConfig": "folders",
    "size_report": "report", "ReportConfig": "report",
    "train_model": "train", "TrainConfig": "train",
    "evaluate_checkpoint": "evaluate", "EvalConfig": "evaluate",
    "encrypt_model": "modelcrypt", "ModelCryptConfig": "modelcrypt",
    "audit_schemes": "audit", "AuditConfig": "audit",
    "EtcError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'etc_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
