"""where: the paths of the data home (LANDSCAPE_DATA), the built checkpoints and the embedded texts."""

from ..errors import UsageError

TEXTS = ("train", "heldout", "sentiment")


def register(subparsers):
    parser = subparsers.add_parser(
        "where", help="print the data home, the built checkpoints and the embedded texts",
        description="Print where landscape keeps its data: the data home (LANDSCAPE_DATA, else "
                    "~/.cache/landscape), the checkpoints that data/build_checkpoints.py (in a clone of the "
                    "repository) built under it, "
                    "the embedded texts and the embedded model.  With an option, print that one path alone, "
                    "for use in a shell: M=$(landscape where --checkpoint smollm2-135m-instruct).")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--checkpoint", metavar="NAME", default=None,
                        help="the folder of a built checkpoint (refused, saying how to build it, when it is not built)")
    choice.add_argument("--text", choices=TEXTS, default=None,
                        help="the file of an embedded text (it may not be extracted yet: the first use does that)")
    choice.add_argument("--data-home", action="store_true", help="the data home alone")
    parser.set_defaults(func=run, torch_free=True)


def run(args):
    from ..data.embedded_text import text_outputs
    from ..datahome import EMBEDDED_MODEL_DIR, built_checkpoints, checkpoints_dir, data_home, how_to_build_checkpoints

    home, built = data_home(), built_checkpoints()
    if args.data_home:
        print(home)
    elif args.text:
        print(text_outputs(home)[args.text])
    elif args.checkpoint:
        if args.checkpoint not in built:
            have = f" (built: {', '.join(built)})" if built else ""
            raise UsageError(f"no checkpoint '{args.checkpoint}' under {checkpoints_dir()}{have}; build it with "
                             f"{how_to_build_checkpoints()}")
        print(built[args.checkpoint])
    else:
        _print_all(home, built, checkpoints_dir(), text_outputs(home), EMBEDDED_MODEL_DIR)
    return 0


def _print_all(home, built, checkpoints, texts, model):
    import os

    from ..datahome import how_to_build_checkpoints

    origin = "LANDSCAPE_DATA" if os.environ.get("LANDSCAPE_DATA") else "default; set LANDSCAPE_DATA to move it"
    print(f"data home        {home}  ({origin})")
    for name, path in texts.items():
        print(f"text {name:<11} {path}{'' if path.exists() else '  (not extracted yet: made on first use)'}")
    none = f"  (none built; build them with {how_to_build_checkpoints()})"
    print(f"checkpoints      {checkpoints}{'' if built else none}")
    for name, path in built.items():
        print(f"  {name:<22} {path}")
    print(f"embedded model   {model}")
