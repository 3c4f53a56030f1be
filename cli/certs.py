"""`apiary certs`: a CA, host certificates and tokens for a cluster, and more of them later.

  init DIR          a CA, a certificate per --host (and for clients), tokens.json for the queen
                    and NAME.tokens.json for each hive (its own token only)
  add-hive DIR ID   a hive's own token (and certificate, with --address)
  add-client DIR N  a named client token (limits apply per client)
  add-host DIR N    a certificate signed by the existing CA

Nothing is overwritten unless --force: replacing a CA or tokens breaks every certificate and
token already handed out. Uses the `cryptography` package rather than shelling out to openssl:
the same code on every machine, and keys never pass through a command line.
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

from cli.emit import Emitter
from cli.errors import CliError
from cli.parsing import Subparsers, subcommands

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


QUEEN, CLIENT = "queen", "client"


class CertsError(Exception):
    """Refused; the message says what to do instead."""


def parse_host(text: str) -> tuple[str, list[str]]:
    """'queen=10.0.0.1,queen.lan' -> ('queen', ['10.0.0.1', 'queen.lan'])."""
    name, sep, names = text.partition("=")
    if not name or not sep:
        raise argparse.ArgumentTypeError(f"--host {text!r} is not NAME=ADDRESS[,ADDRESS...]")
    return name, [n for n in names.split(",") if n]


def _new_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = _key()
    ca_name = _name("Apiary cluster CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    _write_key(directory / "ca.key", ca_key)
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise CertsError(
            f"no usable CA in {directory} ({exc}); run `apiary certs init` first"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{directory / 'ca.key'} is not a key this tool made")
    return key, cert


def _host_cert(
    directory: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str,
    addresses: list[str],
) -> list[Path]:  # fmt: skip
    ca_key, ca_cert = ca
    key = _key()
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    for address in addresses or (["127.0.0.1", "localhost"] if name != CLIENT else []):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            sans.append(x509.DNSName(address))
    cert = (
        _builder(_name(f"apiary {name}"), ca_cert.subject, key.public_key())
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
    return [directory / f"{name}.pem", directory / f"{name}.key"]


def _write_secret(path: Path, data: object) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    return path


def _token() -> str:
    return secrets.token_urlsafe(32)


def _hive_file(directory: Path, tokens: dict[str, object], hive_id: str) -> Path:
    """What one hive's machine needs: its own token (the queen's credential toward it, and its
    workers', derive from it)."""
    hives = tokens["hives"]
    assert isinstance(hives, dict)
    own = {"hives": {hive_id: hives[hive_id]}}
    return _write_secret(directory / f"{hive_id}.tokens.json", own)


def init(directory: Path, hosts: list[tuple[str, list[str]]], force: bool = False) -> list[Path]:
    """A new CA, host and client certificates, and tokens: the queen's file and one per hive
    (every --host but the queen is a hive)."""
    existing = [p for p in (directory / "ca.pem", directory / "tokens.json") if p.exists()]
    if existing and not force:
        raise CertsError(
            f"{', '.join(map(str, existing))} already exist(s): a new CA and new tokens would "
            "invalidate every certificate and token handed out. Use `apiary certs add-hive`, "
            "`add-client` or `add-host` to add to them, or --force to rotate everything"
        )
    directory.mkdir(parents=True, exist_ok=True)
    ca = _new_ca(directory)
    written = [directory / "ca.pem", directory / "ca.key"]
    for name, addresses in [*hosts, (CLIENT, [])]:
        written += _host_cert(directory, ca, name, addresses)
    hive_ids = [name for name, _ in hosts if name not in (QUEEN, CLIENT)]
    tokens: dict[str, object] = {
        "admin": _token(),
        "clients": {CLIENT: _token()},
        "hives": {hive_id: _token() for hive_id in hive_ids},
    }
    written.append(_write_secret(directory / "tokens.json", tokens))
    written += [_hive_file(directory, tokens, hive_id) for hive_id in hive_ids]
    return written


def _read_tokens(directory: Path) -> dict[str, object]:
    try:
        data = json.loads((directory / "tokens.json").read_text())
    except (OSError, ValueError) as exc:
        raise CertsError(
            f"cannot read {directory / 'tokens.json'} ({exc}); run init first"
        ) from None
    if not isinstance(data, dict):
        raise CertsError(f"{directory / 'tokens.json'} is not a tokens file")
    return data


def add_named(directory: Path, section: str, name: str, force: bool = False) -> list[Path]:
    """A new token in `section` ('hives' or 'clients') of the queen's tokens file."""
    tokens = _read_tokens(directory)
    names = tokens.setdefault(section, {})
    if not isinstance(names, dict):
        raise CertsError(f"{section!r} in tokens.json is not a map of names to tokens")
    if name in names and not force:
        raise CertsError(
            f"{section[:-1]} {name!r} already has a token; --force replaces it (then hand "
            "out the new one)"
        )
    names[name] = _token()
    written = [_write_secret(directory / "tokens.json", tokens)]
    if section == "hives":
        written.append(_hive_file(directory, tokens, name))
    return written


def add_host(directory: Path, name: str, addresses: list[str], force: bool = False) -> list[Path]:
    if (directory / f"{name}.pem").exists() and not force:
        raise CertsError(f"{directory / name}.pem exists; --force replaces it")
    return _host_cert(directory, _load_ca(directory), name, addresses)


def add_certs_verbs(sub: Subparsers) -> None:
    """`apiary certs VERB` (alone: its help)."""
    certs = sub.add_parser(
        "certs", help="a CA, certificates and tokens for a cluster", description=__doc__
    )
    verbs = subcommands(certs, "certs_verb")
    i = verbs.add_parser("init", help="a CA, certificates and tokens for a new cluster")
    i.add_argument("directory", help="where to write them (created)")
    i.add_argument(
        "--host", action="append", default=[], type=parse_host, metavar="NAME=ADDR[,ADDR]",
        help="a certificate for NAME valid for these IPs/DNS names (default 127.0.0.1,localhost);"
        " every NAME but `queen` is a hive and gets its own token",
    )  # fmt: skip
    for verb, what in (("add-hive", "a hive id"), ("add-client", "a client application name"),
                       ("add-host", "a host name")):  # fmt: skip
        a = verbs.add_parser(verb, help=f"add {what} to an existing DIR")
        a.add_argument("directory", help="what `apiary certs init` wrote")
        a.add_argument("name", help=what)
        a.add_argument("--address", action="append", default=[], help="IP or DNS name (hosts)")
    for parser in verbs.choices.values():
        parser.add_argument("--force", action="store_true", help="replace what exists")
        parser.set_defaults(func=cmd_certs)


def run(args: argparse.Namespace) -> list[Path]:
    directory = Path(args.directory)
    if args.certs_verb == "init":
        return init(directory, args.host or [(QUEEN, []), ("hive", [])], args.force)
    if args.certs_verb == "add-hive":
        written = add_named(directory, "hives", args.name, args.force)
        if args.address:
            written += add_host(directory, args.name, args.address, args.force)
        return written
    if args.certs_verb == "add-client":
        return add_named(directory, "clients", args.name, args.force)
    return add_host(directory, args.name, args.address, args.force)


def cmd_certs(args: argparse.Namespace, out: Emitter) -> int:
    try:
        written = run(args)
    except CertsError as exc:
        raise CliError(str(exc)) from None
    for path in written:
        print(path)
    print("Keep the .key files and *tokens.json private (they are written mode 0600).")
    if args.force and args.certs_verb == "init":
        print(
            "Rotated: give every machine its new ca.pem and certificate, the queen tokens.json, "
            "each hive its ID.tokens.json, and clients their new tokens."
        )
    return 0
