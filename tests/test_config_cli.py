"""Settings validation and the command-line contract (exit codes, --json on stdout only)."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib

import pytest

from conftest import REPO, dicom_files, rtqa_command, start_node, storescu
from rtqa_node.config import load_settings
from rtqa_node.errors import ConfigError


def run_rtqa(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*rtqa_command(), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_deploy_example_settings_are_valid():
    settings = load_settings(REPO / "deploy" / "rtqa.example.toml")
    assert settings.tls.enabled and settings.tls.require_client_cert
    assert settings.allowed_networks == ("10.20.0.0/16",)


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('ae_title = "FAR_TOO_LONG_AE_TITLE"', "ae_title"),
        ('allowed_networks = ["10.0.0.300/8"]', "allowed_networks"),
        ("port = 70000", "port"),
        ('[tls]\ncert_file = "a.crt"', "key_file"),
        ('unknown_setting = 1', "unknown_setting"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path, toml, field):
    config = tmp_path / "rtqa.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=field):
        load_settings(config)


def test_environment_overrides_file(tmp_path, monkeypatch):
    config = tmp_path / "rtqa.toml"
    config.write_text('ae_title = "FROMFILE"\nport = 1234\n')
    monkeypatch.setenv("RTQA_PORT", "4321")
    monkeypatch.setenv("RTQA_ALLOWED_CALLING_AES", "A, B")
    settings = load_settings(config)
    assert (settings.ae_title, settings.port, settings.allowed_calling_aes) == ("FROMFILE", 4321, ("A", "B"))
    assert tomllib.loads(config.read_text())["port"] == 1234


def test_status_without_data_is_a_usage_error(tmp_path):
    result = run_rtqa("status", "--data-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "no node data" in result.stderr and result.stdout == ""


def test_serve_with_invalid_settings_exits_2(tmp_path):
    config = tmp_path / "rtqa.toml"
    config.write_text('ae_title = "BAD\\\\AE"\n')
    result = run_rtqa("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2 and "ae_title" in result.stderr


def test_status_json_is_one_document_on_stdout(rt_data, tmp_path):
    node = start_node(tmp_path / "node")
    try:
        storescu(node.port, *dicom_files(rt_data / "eclipse-breast-boost-dicompyler"), check=True)
    finally:
        node.stop()
    result = run_rtqa("status", "--data-dir", str(node.data_dir), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["instances"] == 4 and document["studies"] == 1
    assert isinstance(document["plan_studies"], list) and isinstance(document["jobs"], dict)
    text = run_rtqa("status", "--data-dir", str(node.data_dir))
    assert "objects: 4" in text.stdout
    # the review model the workers use, and whether its weights are where they are looked for
    assert document["review_model"] == {"name": "fused", "folder": str(REPO / "models" / "fused"), "present": True}
    missing = run_rtqa("status", "--data-dir", str(node.data_dir),
                       env={**os.environ, "RTQA_MODELS_DIR": str(tmp_path / "no-models")})
    assert f"review model: fused ({tmp_path / 'no-models' / 'fused'}) MISSING" in missing.stdout
    off = run_rtqa("status", "--data-dir", str(node.data_dir), "--json", env={**os.environ, "RTQA_REVIEW_MODEL": "none"})
    assert json.loads(off.stdout)["review_model"] is None
