"""``ssl transfer``: fine-tuning a checkpoint's backbone end to end on labelled images, label subsets."""
