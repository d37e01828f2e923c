"""TLS associations (PS3.15 B.1) with DCMTK echoscu/storescu and pynetdicom, with and without client certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import start_node, storescu
from dicom_peers import dcmtk, echo
from rtqa_node.dicom.tls import client_context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(cwd: Path, name: str, ca: str, *, subject: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=cwd)
    ext = cwd / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.crt", "-extfile", str(ext), cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A hospital CA issuing the node's and a TPS's certificates, and a rogue CA issuing an intruder's."""
    cwd = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=rtqa test {ca} CA", cwd=cwd)
    _issue(cwd, "server", "ca", subject="/CN=localhost", san="IP:127.0.0.1,DNS:localhost")
    _issue(cwd, "client", "ca", subject="/CN=tps")
    _issue(cwd, "intruder", "rogue", subject="/CN=intruder")
    return cwd


def _tls_node(tmp_path: Path, pki: Path, *, require_client_cert: bool):
    config = tmp_path / "rtqa.toml"
    config.write_text(
        "[tls]\n"
        f'cert_file = "{pki / "server.crt"}"\nkey_file = "{pki / "server.key"}"\nca_file = "{pki / "ca.crt"}"\n'
        f"require_client_cert = {'true' if require_client_cert else 'false'}\n"
    )
    return start_node(tmp_path / "node", config=config)


def test_tls_with_a_valid_client_certificate(tmp_path, pki, rt_data):
    node = _tls_node(tmp_path, pki, require_client_cert=True)
    try:
        result = dcmtk("echoscu", "-aec", "RTQA", "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                       "+cf", str(pki / "ca.crt"), "127.0.0.1", str(node.port))
        assert result.returncode == 0, result.stderr
        sent = storescu(node.port, rt_data / "eclipse-breast-boost-dicompyler" / "rtplan.dcm",
                        extra=("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")))
        assert "Received Store Response (Success)" in sent.stdout + sent.stderr
        context = client_context(ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key")
        assert echo(node.port, ssl_context=context) == (True, False, 0x0000)
    finally:
        node.stop()


def test_tls_refuses_clients_without_a_trusted_certificate(tmp_path, pki):
    node = _tls_node(tmp_path, pki, require_client_cert=True)
    try:
        anonymous = dcmtk("echoscu", "-aec", "RTQA", "+tla", "+cf", str(pki / "ca.crt"),
                          "127.0.0.1", str(node.port))
        assert anonymous.returncode != 0
        intruder = dcmtk("echoscu", "-aec", "RTQA", "+tls", str(pki / "intruder.key"), str(pki / "intruder.crt"),
                         "+cf", str(pki / "ca.crt"), "127.0.0.1", str(node.port))
        assert intruder.returncode != 0
        no_cert = client_context(ca_file=pki / "ca.crt")
        assert echo(node.port, ssl_context=no_cert)[0] is False
        plain = dcmtk("echoscu", "-aec", "RTQA", "127.0.0.1", str(node.port))
        assert plain.returncode != 0
    finally:
        node.stop()


def test_tls_without_client_verification_accepts_anonymous_clients(tmp_path, pki):
    node = _tls_node(tmp_path, pki, require_client_cert=False)
    try:
        result = dcmtk("echoscu", "-aec", "RTQA", "+tla", "+cf", str(pki / "ca.crt"), "127.0.0.1", str(node.port))
        assert result.returncode == 0, result.stderr
        # ... but the client still checks who the node is: a client trusting only the rogue CA refuses it.
        wrong_ca = dcmtk("echoscu", "-aec", "RTQA", "+tla", "+cf", str(pki / "rogue.crt"),
                         "127.0.0.1", str(node.port))
        assert wrong_ca.returncode != 0
    finally:
        node.stop()
