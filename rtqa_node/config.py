"""Settings: one typed object, read once from a TOML file and the environment, then passed down.

Precedence (highest first): command-line flags (applied by the CLI), environment variables ``RTQA_<FIELD>``
for top-level fields (``RTQA_DATA_DIR``, ``RTQA_AE_TITLE``, ``RTQA_PORT``, ...), the TOML file, the defaults
below. Units are in the field names (``_s``, ``_bytes``).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rtqa_node.errors import ConfigError

DEFAULT_DATA_DIR = Path("rtqa-data")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    """An AE title is 1-16 characters of the default character repertoire, no backslash, not all spaces."""
    stripped = value.strip()
    if not stripped or len(value) > 16 or "\\" in value or not value.isascii() or not value.isprintable():
        raise ValueError(f"not a valid AE title: {value!r} (1-16 printable ASCII characters, no backslash)")
    return stripped


class TlsSettings(_Strict):
    """TLS for the storage SCP (standard library ssl). Off unless ``cert_file`` and ``key_file`` are set."""

    cert_file: Path | None = None
    key_file: Path | None = None
    #: CA bundle used to verify client certificates; required when ``require_client_cert`` is true.
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be given together")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file to verify client certificates against")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


#: What a destination can receive (rtqa_node/report/outputs.py): the SR, the risk map as RT Dose (TPS, RT
#: viewers), the risk map as a Parametric Map (radiology viewers), the one-page summary as Encapsulated PDF.
OutputKind = Literal["sr", "riskmap_rtdose", "parametric_map", "pdf"]


class Destination(_Strict):
    """Where results for one calling AE title are sent back to (C-STORE SCU), and which of them.

    ``outputs``: a TPS typically takes ``["sr", "riskmap_rtdose"]`` (the default), a PACS
    ``["sr", "parametric_map", "pdf"]``. Outputs that do not apply to a plan (no dose: no risk map) are skipped.
    """

    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str
    outputs: tuple[OutputKind, ...] = Field(default=("sr", "riskmap_rtdose"), min_length=1)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))


class Settings(_Strict):
    """Everything the node needs to run. Construct with :func:`load_settings`."""

    data_dir: Path = DEFAULT_DATA_DIR
    ae_title: str = "RTQA"
    #: Loopback by default: a node listening on every interface is a decision for hospital IT to make.
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    #: Refuse associations whose Called AE title is not ``ae_title``.
    require_called_ae: bool = True
    #: Calling AE titles allowed to associate; empty allows any.
    allowed_calling_aes: tuple[str, ...] = ()
    #: IP addresses or networks (CIDR) allowed to associate; empty allows any.
    allowed_networks: tuple[str, ...] = ()
    #: Objects larger than this are refused with 0xA700 (and the received bytes discarded).
    max_object_bytes: int = Field(default=2 * 1024**3, gt=0)
    #: Refuse new objects (0xA700) when the store's file system has less free space than this.
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0)
    max_pdu_bytes: int = Field(default=131072, ge=4096)
    #: pynetdicom's reactor threads poll. With ``network_wakeups`` (default) they wait for their socket or
    #: queue instead and wake at once; this is then only the longest wait without an event (timers, kill
    #: flags). Without wake-ups it is the polling interval itself (pynetdicom's own value is 1 ms); see
    #: docs/architecture.md, "Receive", and benchmarks/ingest.py for both.
    network_poll_s: float = Field(default=0.005, gt=0, le=0.05)
    network_wakeups: bool = True
    max_associations: int = Field(default=16, ge=1)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=120.0, gt=0)
    workers: int = Field(default=1, ge=0)
    #: A plan study whose reference chain is incomplete is reviewed anyway this long after its last object.
    stable_age_s: float = Field(default=60.0, gt=0)
    tls: TlsSettings = TlsSettings()
    #: Calling AE title -> where its results go; ``default_destination`` for everyone else.
    destinations: dict[str, Destination] = {}
    default_destination: Destination | None = None
    #: Store results in the outbox without sending them anywhere.
    shadow_mode: bool = False
    dispatch_max_attempts: int = Field(default=8, ge=1)
    dispatch_retry_base_s: float = Field(default=5.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    job_lease_s: float = Field(default=600.0, gt=0)
    #: Trial protocol id (``rtqa_node/checks/protocols``) for every review; None: chosen per plan from its
    #: Clinical Trial Protocol ID or RT Plan Label, else generic checks only.
    review_protocol: str | None = None
    #: The trained model that adds predictions and the attention risk map to every review: a folder name under
    #: models/ (or ``$RTQA_MODELS_DIR``) or a path. None (``RTQA_REVIEW_MODEL=none``): the rule-based review only,
    #: with the interim OAR-excess risk map. Research models, not for clinical decisions (models/README.md).
    review_model: str | None = "fused"

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))

    @field_validator("review_model")
    @classmethod
    def _check_review_model(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none", "off") else value.strip()

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_calling_aes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_networks: {item!r} is not an IP address or CIDR network") from exc
        return value

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "objects"

    @property
    def tmp_dir(self) -> Path:
        """Incoming objects are streamed here; on the same file system as the store so rename is atomic."""
        return self.data_dir / "tmp"

    @property
    def index_path(self) -> Path:
        return self.data_dir / "index.sqlite"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"


_ENV_PREFIX = "RTQA_"


def _from_environment(fields: dict[str, Any]) -> dict[str, Any]:
    """Top-level scalar fields from ``RTQA_<FIELD>``; list fields as comma-separated values."""
    found: dict[str, Any] = {}
    for name, field in fields.items():
        raw = os.environ.get(_ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if "tuple" in str(field.annotation):
            found[name] = tuple(v.strip() for v in raw.split(",") if v.strip())
        else:
            found[name] = raw
    return found


#: a trained model's weights file in its folder (``ml.train.TrainedModel.save``)
MODEL_WEIGHTS_NAME = "model.pt"


def models_dir() -> Path:
    """$RTQA_MODELS_DIR, else the repository's models/ folder (an installed, non-editable package needs the
    variable: deploy/Containerfile sets it)."""
    return Path(os.environ.get("RTQA_MODELS_DIR") or Path(__file__).resolve().parents[1] / "models")


def model_folder(model: str) -> Path:
    """A model by name (a folder under :func:`models_dir`: ``fused``, ``spatial``, ``tabular``...) or by path."""
    path = Path(model)
    return path if path.is_absolute() or len(path.parts) > 1 else models_dir() / model


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), then the environment, then ``overrides`` (``None`` values are ignored).

    Raises:
        ConfigError: the file is unreadable or a value is invalid; the message names the field.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(Path(config_file).read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    values.update(_from_environment(Settings.model_fields))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(f"invalid settings: {exc}") from exc
