"""blip2: Salesforce BLIP-2 vision-language models at a shell prompt.

Nothing heavy is imported here: ``blip2 --help`` and shell completion must stay
instant, so torch, transformers and Pillow are imported inside the functions that
need them.
"""

__version__ = "0.1.0"
