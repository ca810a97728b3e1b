"""Signatures (``model.sig``, OpenSSF Model Signing): the sign command, and the options that
make one (make-delta) or check one (apply, verify). Thin over :mod:`deltamerge.integrity.signing`,
imported when a command runs so that ``--help`` needs neither torch nor model-signing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .common import handle_errors, say

if TYPE_CHECKING:
    from ..integrity.signing import SignerPin, SigningKey

HELP = {"help_option_names": ["-h", "--help"]}
PEM = click.Path(exists=True, dir_okay=False)


def _options(fn: Callable, options: list[click.Option]) -> Callable:
    for option in reversed(options):
        fn = option(fn)
    return fn


def signing_options(prefix: str) -> Callable[[Callable], Callable]:
    """What a publisher signs with: an EC key, and for a certificate signer its certificate
    and chain (make-delta: ``--sign-key``; the sign command: ``--key``)."""
    return lambda fn: _options(fn, [
        click.option(f"{prefix}key", "sign_key", type=PEM, default=None, metavar="KEY.pem",
                     help="Write model.sig (OpenSSF Model Signing) with this EC private key "
                          "(with a certificate: the certificate's key)."),
        click.option(f"{prefix}cert", "sign_cert", type=PEM, default=None, metavar="CERT.pem",
                     help="Sign with this certificate (its key is the key option's)."),
        click.option(f"{prefix}chain", "sign_chain", type=PEM, multiple=True, metavar="CHAIN.pem",
                     help="The certificates from the signing certificate up to its root "
                          "(repeatable; needed with a certificate)."),
        click.option(f"{prefix}sigstore", "sign_sigstore", is_flag=True,
                     help="Sign with Sigstore instead of a key: a certificate for your OIDC "
                          "identity (ambient credentials in CI, else a browser login), logged "
                          "publicly in Rekor."),
    ])


def pin_options(fn: Callable) -> Callable:
    """Who must have signed (``--signer-*``): given by the user, never taken from the folder."""
    return _options(fn, [
        click.option("--signer-key", type=PEM, default=None, metavar="PUB.pem",
                     help="Refuse unless model.sig is signed by this public key (checked before "
                          "any weight is read)."),
        click.option("--signer-root", type=PEM, default=None, metavar="ROOT.pem",
                     help="Refuse unless model.sig is signed by a certificate this root issued, "
                          "named by --signer-name."),
        click.option("--signer-name", default=None, metavar="NAME",
                     help="With --signer-root: the signing certificate's subject, as RFC 4514 "
                          "(CN=...,O=..., compared whole) or its common name alone."),
        click.option("--signer-identity", default=None, metavar="EMAIL|URI",
                     help="Refuse unless model.sig is a Sigstore signature by this identity "
                          "(with --signer-issuer)."),
        click.option("--signer-issuer", default=None, metavar="URL",
                     help="With --signer-identity: the OIDC issuer that vouched for it "
                          "(e.g. https://github.com/login/oauth)."),
    ])


def signing_key(key: str | None, cert: str | None, chain: tuple[str, ...],
                sigstore: bool = False) -> SigningKey | None:
    """The library's ``sign=`` for the signing options (None when no signer is given)."""
    if key is None and not sigstore:
        if cert or chain:
            raise click.UsageError("a certificate signs with its private key: give the key too")
        return None
    from ..integrity.signing import SigningKey

    return SigningKey(Path(key) if key else None, Path(cert) if cert else None,
                      tuple(Path(c) for c in chain), sigstore)


def signer_pin(key: str | None, root: str | None, name: str | None, identity: str | None = None,
               issuer: str | None = None) -> SignerPin | None:
    """The library's ``signer=`` for the ``--signer-*`` options (None when none is given)."""
    if all(v is None for v in (key, root, name, identity, issuer)):
        return None
    from ..integrity.signing import SignerPin

    return SignerPin(Path(key) if key else None, Path(root) if root else None, name, identity,
                     issuer)


@click.command("sign", context_settings=HELP)
@click.argument("folder", type=click.Path(exists=True, file_okay=False), metavar="DIR")
@signing_options("--")
@handle_errors
def sign_cmd(folder: str, sign_key: str | None, sign_cert: str | None,
             sign_chain: tuple[str, ...], sign_sigstore: bool) -> None:
    """Sign every file of DIR into DIR/model.sig (OpenSSF Model Signing, sha256 per file).

    Any tool that reads the format checks it (`model_signing verify key DIR --signature
    DIR/model.sig --public_key PUB.pem`); deltamerge's apply and verify check it with
    --signer-key or --signer-root. Needs `pip install 'deltamerge[sign]'`.

    \b
    Examples:
      deltamerge sign ./my-delta --key signing-key.pem
      deltamerge sign ./my-delta --key leaf-key.pem --cert leaf.pem --chain chain.pem
      deltamerge sign ./my-delta --sigstore
    """
    from ..integrity.signing import sign_folder

    signing = signing_key(sign_key, sign_cert, sign_chain, sign_sigstore)
    if signing is None:
        raise click.UsageError("sign needs --key (and --cert/--chain for a certificate) or "
                               "--sigstore")
    signer = sign_folder(Path(folder), signing)
    say(f"signed {folder}/model.sig by {signer.describe()}")

