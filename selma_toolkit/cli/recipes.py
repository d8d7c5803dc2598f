"""`selma recipe validate|show|list`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from selma_toolkit.cli.app import SelmaTyper, SetOption, app, console

recipe_app = SelmaTyper(help="Validate and show recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


# ---------------------------------------------------------------------------------------- recipe


@recipe_app.command("validate")
def recipe_validate(
    recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")],
    set_: SetOption = None,
) -> None:
    """Check recipes; print OK or what is wrong (exit 2)."""
    from selma_toolkit.recipe import RunRecipe, load_recipe

    for ref in recipes:
        recipe = load_recipe(ref, set_ or [])
        kind = "run" if isinstance(recipe, RunRecipe) else "skill"
        extra = f", skills: {', '.join(s.name for s in recipe.skills)}" if isinstance(recipe, RunRecipe) else ""
        console.print(f"[green]OK[/green] {ref}: {kind} recipe {recipe.name!r}{extra}")


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped name.")],
    set_: SetOption = None,
) -> None:
    """Print the fully resolved recipe (defaults filled in, skills inline) as TOML."""
    from selma_toolkit.recipe import load_recipe, recipe_hash, resolved_toml

    loaded = load_recipe(recipe, set_ or [])
    sys.stdout.write(f"# sha256 {recipe_hash(loaded)}\n" + resolved_toml(loaded))


@recipe_app.command("list")
def recipe_list() -> None:
    """List the shipped skill and run recipes."""
    from selma_toolkit.resources import shipped_dir

    root = shipped_dir("recipes")
    for kind in ("skills", "runs"):
        names = sorted(p.stem for p in (root / kind).glob("*.toml"))
        console.print(f"[bold]{kind}[/bold]: {', '.join(names)}")
