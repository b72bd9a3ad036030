from ssl_cli.config.load import builtin_recipes, load_recipe, recipe_from_dict, recipes_dir
from ssl_cli.config.schema import Recipe

__all__ = ["Recipe", "builtin_recipes", "load_recipe", "recipe_from_dict", "recipes_dir"]
