from ssl_cli.augment.views import MultiView, eval_transform, train_eval_transform, view_transform

__all__ = ["MultiView", "eval_transform", "train_eval_transform", "view_transform"]
