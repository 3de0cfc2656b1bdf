"""``keybroker`` subcommands.

Every command and argument carries a help text, shown without markup by ``keybroker … --help``.
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
from keybroker.cli import audit, health, kek, migrate, privacy, recordings
from keybroker.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, config_path
from keybroker.errors import ConfigurationError, KeybrokerError

DEFAULT_STATE_DIR = Path(".keybroker")
# the subcommands besides `serve` and `dev`, in the order `keybroker --help` lists them; each
# module's register() adds its parser(s)
SUBCOMMANDS = (migrate, health, kek, privacy, recordings, audit)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from keybroker import cli, settings
    from keybroker.server.app import serve
    from keybroker.server.logs import configure_logging

    loaded = settings.load(config_path(args.config))
    configure_logging(loaded.telemetry.log_level, loaded.telemetry.log_format)
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
        os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        print(
            f"token written to {args.output} (mode 600, valid {args.lifetime} s)", file=sys.stderr
        )
    return EXIT_OK


DESCRIPTION = (
    "keybroker: a gRPC key broker for recordings. `serve` runs the broker; the other commands "
    "call a running broker (kek, privacy, encrypt, decrypt), read files (inspect, audit) or set "
    "up a development environment (dev). Exit codes: 0 success, 1 failure or refusal, "
    "2 usage or configuration error."
)
SERVE_DESCRIPTION = (
    "Run the broker: check the settings and TLS files, take the audit journal (one writer per "
    "journal), log in to the HSM, open the state store and listen on [server] listen over mutual "
    "TLS until SIGTERM or SIGINT. A configuration problem exits with code 2 and a message "
    "naming the setting (docs/TROUBLESHOOTING.md)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keybroker", description=DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"keybroker {__version__}", help="show the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the broker", description=SERVE_DESCRIPTION)
    p.add_argument("--config", help="TOML settings file (default: $KEYBROKER_CONFIG)")
    p.set_defaults(func=_cmd_serve)

    for command in SUBCOMMANDS:
        command.register(sub)

    dev = sub.add_parser("dev", help="embedded development environment").add_subparsers(
        dest="dev_command", required=True
    )
    p = dev.add_parser("init", help="provision SoftHSM token, KEK, dev PKI and token issuer")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=STATE_DIR_HELP)
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="address the broker will listen on (default 127.0.0.1:50051)",
    )
    p.set_defaults(func=_cmd_dev_init)
    p = dev.add_parser(
        "token",
        help="mint a dev access token",
        description="Mint an access token signed by the dev issuer of `keybroker dev init`. "
        "Write it to a file with --output (mode 600) and point [client] token_file or "
        "--token-file at it; without --output it is printed.",
    )
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=STATE_DIR_HELP)
    p.add_argument(
        "--scope", action="append", default=[], help="scope(s); repeat or space-separate"
    )
    p.add_argument(
        "--purpose", action="append", default=[], help="purpose granted, e.g. support; repeat"
    )
    p.add_argument("--subject", default="dev-storage", help="the token's sub (dev-storage)")
    p.add_argument("--lifetime", type=int, default=3600, help="seconds (default 3600)")
    p.add_argument("--amr", action="append", default=[], help="e.g. --amr mfa")
    p.add_argument(
        "--cnf", action="store_true", help="bind the token to the dev client certificate"
    )
    p.add_argument("--output", type=Path, help="write the token to this file (mode 600)")
    p.set_defaults(func=_cmd_dev_token)
    _describe(parser)
    return parser


STATE_DIR_HELP = "the dev environment's folder (default .keybroker)"


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand without a description its help line as one, so that
    ``keybroker COMMAND --help`` always says what the command does."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if not child.description and helps.get(name):
                    text = str(helps[name])
                    child.description = text[0].upper() + text[1:] + "."
                _describe(child)


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
