"""`llamapro expand | verify | strip | pack | apply | demo-model`: the model surgery commands (grow a
model by identity blocks, prove it, take the blocks out again, ship them as packs)."""

from __future__ import annotations

import argparse

from llamapro.errors import EXIT_OK


def _positions(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--positions takes comma-separated integers (indices of the new blocks in the "
            f"expanded model), got {s!r}") from None


def _writers(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cmd_expand(a) -> int:
    from llamapro.expansion import api as steps

    meta = steps.expand(a.base, a.out, blocks=a.blocks, strategy=a.strategy, positions=a.positions,
                        residual_writers=a.residual_writers, verify=not a.no_verify, force=a.force,
                        trust_remote_code=a.trust_remote_code, progress=not a.quiet,
                        durable=not a.no_fsync)
    print(steps.dumps(meta) if a.json else f"expanded -> {a.out}\n{steps.summary(meta)}")
    return EXIT_OK


def cmd_verify(a) -> int:
    from llamapro.expansion import api as steps

    meta = steps.verify_checkpoint(a.checkpoint, base=a.base, max_new_tokens=a.max_new_tokens,
                                   trust_remote_code=a.trust_remote_code)  # IdentityError: exit 3
    print(steps.dumps(meta["verification"]) if a.json else steps.summary(meta))
    return EXIT_OK


def cmd_strip(a) -> int:
    from llamapro.expansion import api as steps

    if a.pack is not None:  # one pack of an applied model; the others stay
        from llamapro.publish.pack import strip_pack

        res = strip_pack(a.checkpoint, a.out, a.pack, force=a.force, progress=not a.quiet)
        print(steps.dumps(res) if a.json else
              f"removed pack {res['removed']} -> {a.out}: " + (
                  f"packs {[p['name'] for p in res['packs']]} remain, as `llamapro apply` of them writes"
                  if res["packs"] else "the base, bit for bit" if res["equals_base"] else "the base's layers"))
        return EXIT_OK
    res = steps.strip(a.checkpoint, a.out, force=a.force, progress=not a.quiet)
    if a.json:
        print(steps.dumps(res))
    else:
        print(f"stripped layers {res['removed_layers']} -> {a.out}")
        print("tensors and config equal the recorded base bit for bit" if res["equals_base"] else
              "the result differs from the recorded base (the original layers were trained, or "
              "the base was modified): it has the base's architecture, not its exact weights")
    return EXIT_OK


def cmd_pack(a) -> int:
    from llamapro.expansion import api as steps
    from llamapro.pipeline import pack_step

    res = pack_step(a.source, a.out, force=a.force, name=a.name, trust_remote_code=a.trust_remote_code)
    print(steps.dumps(res) if a.json else
          f"pack {res['name']} -> {a.out}: {len(res['positions'])} blocks at {res['positions']} of "
          f"{res['num_layers']} layers, {res['blocks']['bytes'] / 1e6:.1f} MB\nfor the base {res['base_fingerprint']}")
    return EXIT_OK


def cmd_apply(a) -> int:
    from llamapro.expansion import api as steps
    from llamapro.publish.pack import apply_packs

    res = apply_packs(a.base, a.packs, a.out, force=a.force, progress=not a.quiet)
    if a.json:
        print(steps.dumps(res))
    else:
        for p in res["packs"]:
            print(f"pack {p['name']} ({p['mode']}) at layers {p['positions']}")
        print(f"applied -> {a.out} ({res['num_layers']} layers)\nidentity     PROVEN on the tensors: "
              f"{res['verification']['statement']}")
        if res["equals_trained_model"]:
            print("the result is the trained model the last pack was made from (same fingerprint)")
    return EXIT_OK


def cmd_demo_model(a) -> int:
    from llamapro.demo import ensure_demo_model

    print(ensure_demo_model())
    return EXIT_OK


def add_expand_commands(subparsers) -> None:
    """Register expand, verify, strip, pack, apply and demo-model on an argparse subparsers object."""
    e = subparsers.add_parser("expand", help="insert identity blocks into a model and prove identity")
    e.add_argument("base", help="HF model directory, hub id, or demo:smollm2-135m-instruct")
    e.add_argument("out", help="output directory (must not exist unless --force)")
    e.add_argument("--blocks", type=int, help="number of new blocks (N >= 1)")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--strategy", default="even", choices=["even", "top", "bottom", "middle"])
    g.add_argument("--positions", type=_positions,
                   help="comma-separated indices of the new blocks in the expanded model")
    e.add_argument("--residual-writers", type=_writers,
                   help="for an unlisted family: module paths that write into the residual stream")
    e.add_argument("--no-verify", action="store_true", help="skip the numerical proof")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    e.add_argument("--no-fsync", action="store_true",
                   help="publish without waiting for the data to reach the disk (like cp; for "
                        "scratch output uploaded right away)")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--json", action="store_true", help="print the metadata as JSON")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(fn=cmd_expand)

    v = subparsers.add_parser("verify", help="prove an expanded checkpoint computes what its base computed")
    v.add_argument("checkpoint")
    v.add_argument("--base", help="base model (default: the recorded base, else new blocks skipped)")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--trust-remote-code", action="store_true")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_verify)

    s = subparsers.add_parser("strip", help="remove the new blocks again (rollback to the base)")
    s.add_argument("checkpoint")
    s.add_argument("out")
    s.add_argument("--force", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--pack", default=None, metavar="NAME",
                   help="of a model made by `llamapro apply`: remove only this pack (name or stack "
                        "position, 0 first); the result equals `apply` of the others")
    s.set_defaults(fn=cmd_strip)

    pk = subparsers.add_parser("pack", help="the inserted blocks of a trained run as a small pack for its base")
    pk.add_argument("source", metavar="RUN_OR_MODEL")
    pk.add_argument("out", metavar="OUT")
    pk.add_argument("--name", default=None, help="the pack's name (default: OUT's name)")
    pk.add_argument("--force", action="store_true", help="replace OUT if it exists")
    pk.add_argument("--trust-remote-code", action="store_true")
    pk.add_argument("--json", action="store_true")
    pk.set_defaults(fn=cmd_pack)

    ap = subparsers.add_parser("apply", help="a standard checkpoint from a base and packs (stacked in order)")
    ap.add_argument("base", help="the base model the packs were made for (checked by fingerprint)")
    ap.add_argument("packs", nargs="+", metavar="PACK")
    ap.add_argument("out", metavar="OUT")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.set_defaults(fn=cmd_apply)

    d = subparsers.add_parser("demo-model", help="convert the bundled SmolLM2 GGUF to a cached HF directory")
    d.set_defaults(fn=cmd_demo_model)
