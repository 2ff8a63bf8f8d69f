"""A throw-away PKI for the TLS tests, made with the openssl command line (no extra Python package).

Two CAs: the hospital's (``ca``), which signs the node's certificate (SAN IP:127.0.0.1 and
DNS:localhost), a scanner's client certificate and a second server certificate (``peer``, for a
TLS storage SCP standing in for the PACS); and a ``rogue`` CA, which signs certificates with the
same names that nobody trusts.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from tests.integration.harness import require_binary

_DAYS = "2"


@dataclasses.dataclass(frozen=True)
class KeyPair:
    certificate: Path
    private_key: Path


@dataclasses.dataclass(frozen=True)
class PKI:
    folder: Path
    ca: Path  # the hospital CA certificate (the trust anchor of the node and its peers)
    node: KeyPair  # SAN IP:127.0.0.1, DNS:localhost; server and client use
    scanner: KeyPair  # client certificate of a scanner
    peer: KeyPair  # SAN IP:127.0.0.1, DNS:localhost; a TLS PACS
    rogue_ca: Path
    rogue: KeyPair  # SAN IP:127.0.0.1, DNS:localhost, signed by the rogue CA
    wrong_host: KeyPair  # signed by the hospital CA, but for DNS:elsewhere.example only

    def tls_section(self) -> dict[str, str]:
        """The node's [tls] table."""
        return {
            "certificate": str(self.node.certificate),
            "private_key": str(self.node.private_key),
            "ca_certificates": str(self.ca),
        }


def _openssl(*args: str) -> None:
    result = subprocess.run([require_binary("openssl", "openssl"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr[-2000:]}")


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pair.private_key), "-out", str(pair.certificate), "-days", _DAYS, "-subj", f"/CN=test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def _leaf(folder: Path, name: str, ca: KeyPair, san: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    request = folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pair.private_key), "-out", str(request), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.certificate), "-CAkey", str(ca.private_key),
        "-CAcreateserial", "-out", str(pair.certificate), "-days", _DAYS, "-extfile", str(extensions),
    )  # fmt: skip
    pair.private_key.chmod(0o600)
    return pair


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    rogue_ca = _ca(folder, "rogue-ca")
    local = "IP:127.0.0.1,DNS:localhost"
    return PKI(
        folder=folder,
        ca=ca.certificate,
        node=_leaf(folder, "node", ca, local),
        scanner=_leaf(folder, "scanner", ca, "DNS:scanner.hospital.example"),
        peer=_leaf(folder, "peer", ca, local),
        rogue_ca=rogue_ca.certificate,
        rogue=_leaf(folder, "rogue", rogue_ca, local),
        wrong_host=_leaf(folder, "wrong-host", ca, "DNS:elsewhere.example"),
    )


def encrypted_key(key: Path, out: Path, password: str = "secret") -> Path:
    """A copy of ``key`` encrypted with ``password`` (PKCS#8, AES-256)."""
    _openssl("pkey", "-in", str(key), "-aes256", "-passout", f"pass:{password}", "-out", str(out))
    return out
