"""`apiary certs init DIR`: a CA, per-host certificates, a client certificate and a tokens file
for a test or small cluster.

Uses the `cryptography` package rather than shelling out to openssl: the same code on every
machine, no parsing of a tool's output, and keys never pass through a command line.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from apiary.security import ROLES

VALID_DAYS = 825


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Apiary"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key: object) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def parse_host(text: str) -> tuple[str, list[str]]:
    """'queen=10.0.0.1,queen.lan' -> ('queen', ['10.0.0.1', 'queen.lan'])."""
    name, sep, names = text.partition("=")
    if not name or not sep:
        raise argparse.ArgumentTypeError(f"--host {text!r} is not NAME=ADDRESS[,ADDRESS...]")
    return name, [n for n in names.split(",") if n]


def init(directory: Path, hosts: list[tuple[str, list[str]]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca_key = _key()
    ca_name = _name("Apiary cluster CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    written += [directory / "ca.pem", directory / "ca.key"]

    for name, addresses in [*hosts, ("client", [])]:
        key = _key()
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        for address in addresses or (["127.0.0.1", "localhost"] if name != "client" else []):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                sans.append(x509.DNSName(address))
        cert = (
            _builder(_name(f"apiary {name}"), ca_name, key.public_key())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # Servers are also clients of each other (mTLS): both usages.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(directory / f"{name}.key", key)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written += [directory / f"{name}.pem", directory / f"{name}.key"]

    tokens = directory / "tokens.json"
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({role: secrets.token_urlsafe(32) for role in ROLES}, f, indent=2)
    written.append(tokens)
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="apiary certs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    i = sub.add_parser(
        "init", help="write ca.pem/key, NAME.pem/key per --host, client.pem/key, tokens.json"
    )
    i.add_argument("directory")
    i.add_argument(
        "--host",
        action="append",
        default=[],
        type=parse_host,
        metavar="NAME=ADDR[,ADDR]",
        help="a certificate for NAME valid for these IPs/DNS names (default 127.0.0.1,localhost)",
    )
    args = p.parse_args(argv)
    hosts = args.host or [("queen", []), ("hive", [])]
    for path in init(Path(args.directory), hosts):
        print(path)
    print("Keep the .key files and tokens.json private (they are written mode 0600).")
    return 0
