"""TLS for DICOM associations (PS3.15 B.1, "Basic TLS Secure Transport Connection Profile"), standard library ssl."""

from __future__ import annotations

import ssl

from rtqa_node.config import TlsSettings
from rtqa_node.errors import ConfigError


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """An SSLContext for the SCP: our certificate, TLS 1.2+, client certificates verified when required.

    Raises:
        ConfigError: a certificate or key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=settings.cert_file, keyfile=settings.key_file)
        if settings.ca_file is not None:
            context.load_verify_locations(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate, key or CA file: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_NONE
    return context


def client_context(*, ca_file=None, cert_file=None, key_file=None, check_hostname: bool = False) -> ssl.SSLContext:
    """An SSLContext for the SCU side (dispatch, tests): verify the server against ``ca_file`` when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if ca_file is None:
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    return context
