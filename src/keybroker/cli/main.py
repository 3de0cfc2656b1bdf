"""``keybroker`` subcommands.

Exit codes: 0 success; 1 runtime failure (HSM unavailable, refused; for ``audit verify``: the
journal fails verification); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from keybroker import __version__
from keybroker.errors import ConfigurationError, KeybrokerError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DEFAULT_STATE_DIR = Path(".keybroker")


def config_path(arg: str | None) -> Path | None:
    value = arg or os.environ.get("KEYBROKER_CONFIG")
    return Path(value) if value else None


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from keybroker import cli, settings
    from keybroker.cli.logs import configure_logging
    from keybroker.server.app import serve

    loaded = settings.load(config_path(args.config))
    configure_logging(loaded.telemetry.log_level)
    if not cli.GRPC_PREPARED:  # grpc came first (keybroker embedded): gRPC's defaults apply
        logging.getLogger(__name__).warning(
            "grpc was imported before keybroker could set GRPC_EXPERIMENTS; serving with "
            "gRPC's default I/O threads (slower; see docs/DEPLOYMENT.md)"
        )
    serve(loaded)
    return EXIT_OK


def _cmd_dev_init(args: argparse.Namespace) -> int:
    from keybroker.devenv import provision

    env = provision(args.state_dir, listen=args.listen)
    print(usage_hint(env.root, args.listen))
    return EXIT_OK


def usage_hint(state_dir: Path, listen: str = "127.0.0.1:50051") -> str:
    s = shlex.quote(str(state_dir))
    return f"""
keybroker dev environment ready in {state_dir}/

In another terminal, mint a dev token and ask for a data key:

  TOKEN=$(.venv/bin/keybroker dev token --state-dir {s} \\
      --scope keys:generate --scope keys:unwrap --purpose support)
  .venv/bin/grpcurl -cacert {s}/pki/ca.pem -cert {s}/pki/client.pem -key {s}/pki/client.key \\
      -H "authorization: Bearer $TOKEN" \\
      -d '{{"recording_id": "rec-0001", "purposes": ["support"], "subject_ids": ["subj-42"]}}' \\
      {listen} keybroker.v1.KeyBroker/GenerateDataKey

Platform engineers manage keys through the broker (admin tokens need MFA: --amr mfa):

  .venv/bin/keybroker dev token --state-dir {s} --scope keys:admin --amr mfa \\
      --output {s}/admin.token
  .venv/bin/keybroker kek show recordings --config {s}/keybroker.toml \\
      --token-file {s}/admin.token
"""


def _cmd_dev_token(args: argparse.Namespace) -> int:
    from keybroker.devenv import DevEnv, mint_token

    env = DevEnv(args.state_dir)
    if not env.signing_key.exists():
        raise ConfigurationError(f"no dev issuer in {args.state_dir}: run `keybroker dev init`")
    scopes = [s for value in args.scope for s in value.split()]
    token = mint_token(
        env,
        scopes=scopes,
        purposes=args.purpose,
        subject=args.subject,
        lifetime=args.lifetime,
        cnf_cert=env.cert("client") if args.cnf else None,
        amr=args.amr,
    )
    if args.output is None:
        print(token)
    else:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"keybroker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the broker")
    p.add_argument("--config", help="TOML settings file (default: $KEYBROKER_CONFIG)")
    p.set_defaults(func=_cmd_serve)

    from keybroker.cli import audit, kek, migrate, privacy, recordings

    migrate.register(sub)
    kek.register(sub)
    privacy.register(sub)
    recordings.register(sub)
    audit.register(sub)

    dev = sub.add_parser("dev", help="embedded development environment").add_subparsers(
        dest="dev_command", required=True
    )
    p = dev.add_parser("init", help="provision SoftHSM token, KEK, dev PKI and token issuer")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.set_defaults(func=_cmd_dev_init)
    p = dev.add_parser("token", help="mint a dev access token")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument(
        "--scope", action="append", default=[], help="scope(s); repeat or space-separate"
    )
    p.add_argument("--purpose", action="append", default=[])
    p.add_argument("--subject", default="dev-storage")
    p.add_argument("--lifetime", type=int, default=3600, help="seconds (default 3600)")
    p.add_argument("--amr", action="append", default=[], help="e.g. --amr mfa")
    p.add_argument(
        "--cnf", action="store_true", help="bind the token to the dev client certificate"
    )
    p.add_argument("--output", type=Path, help="write the token to this file (mode 600)")
    p.set_defaults(func=_cmd_dev_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigurationError as exc:
        print(f"keybroker: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeybrokerError as exc:
        print(f"keybroker: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"keybroker: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
