"""Command-line flags of sd-webui-perfusion (read by the WebUI before it parses its own)."""


def preload(parser):
    parser.add_argument(
        "--perfusion-dir", type=str, default=None, help="folder of Perfusion concept files (default: models/perfusion)"
    )
