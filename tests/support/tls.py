"""TLS material made in the test, and a Mosquitto with TLS listeners (issue 18, connectivity).

:func:`make_pki` runs the ``openssl`` CLI (Debian's ``openssl``, in the Makefile's TEST_DEBS;
no key is checked in): a CA, a server certificate for ``127.0.0.1`` and ``localhost`` signed by
it, a client certificate (CN ``bridge-client``) signed by it, and a second, unrelated CA that
trusts neither (the "wrong CA").

:class:`TlsMosquitto` is :class:`~tests.support.services.MosquittoServer` with four listeners:

``port``          plain, anonymous: for the test's subscriber (and the readiness check)
``tls_port``      TLS, anonymous
``mtls_port``     TLS, ``require_certificate true`` + ``use_identity_as_username true``: a client
                  without a certificate signed by the CA is refused
``password_port`` TLS, ``allow_anonymous false`` and a password file (``user``/``secret``)

Every listener is one broker: what is published on one is delivered on the others.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.services import MosquittoServer, RedisServer, free_port, require_binary

# No ":" in it: mosquitto 2.0 does not read such a password back from its password file.
USERNAME, PASSWORD = "bridge", "s3cret@odd/chars%"
CLIENT_CN = "bridge-client"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed none of the above."""


def _openssl(*args: str | Path) -> None:
    openssl = require_binary("openssl", "openssl")
    subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=30)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN=coap-bridge test {name}", "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_leaf(
    folder: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n" + extensions
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", subject, "-keyout", key, "-out", request,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca")
    server = _make_leaf(
        folder,
        "server",
        "/CN=localhost",
        ca,
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    client = _make_leaf(folder, "client", f"/CN={CLIENT_CN}", ca, "extendedKeyUsage=clientAuth\n")
    other, _ = _make_ca(folder, "other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other)


class TlsMosquitto(MosquittoServer):
    """Mosquitto with the listeners of the module docstring, on free ports."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.tls_port = free_port()
        self.mtls_port = free_port()
        self.password_port = free_port()

    def url_of(self, port: int, userinfo: str = "") -> str:
        return f"mqtts://{userinfo}{self.host}:{port}"

    def command(self) -> list[str]:
        passwords = self.workdir / "passwords"
        passwords.write_text(f"{USERNAME}:{PASSWORD}\n")
        tool = require_binary("mosquitto_passwd", "mosquitto")
        subprocess.run([tool, "-U", str(passwords)], check=True, capture_output=True, timeout=30)
        tls = (
            f"cafile {self.pki.ca}\ncertfile {self.pki.server_cert}\n"
            f"keyfile {self.pki.server_key}\n"
        )
        config = self.workdir / "mosquitto.conf"
        # Started as root, mosquitto switches to the user "mosquitto" before it reads the
        # password file and the keys, which live in this test's private (0700) folder.
        keep_user = "user root\n" if os.geteuid() == 0 else ""
        config.write_text(
            keep_user + "per_listener_settings true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
            "log_type notice\n"
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            f"listener {self.tls_port} {self.host}\n"
            "allow_anonymous true\n" + tls + f"listener {self.mtls_port} {self.host}\n"
            "allow_anonymous false\n"
            "require_certificate true\n"
            "use_identity_as_username true\n" + tls + f"listener {self.password_port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {passwords}\n" + tls
        )
        return [self.executable, "-c", str(config)]


class TlsRedis(RedisServer):
    """redis-server (built with TLS, as Debian's is) with a TLS port beside its plain one
    (the plain one for the readiness check): ``tls_port``, the certificate of :func:`make_pki`,
    clients not asked for a certificate."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.tls_port = free_port()

    def tls_url(self, query: str = "") -> str:
        return f"rediss://localhost:{self.tls_port}/0" + (f"?{query}" if query else "")

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(self.pki.server_cert),
            "--tls-key-file", str(self.pki.server_key),
            "--tls-ca-cert-file", str(self.pki.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
