"""Look at the data before training: `python -m sam_lightning.inspect data=coco data.root=...`.

Writes a PNG grid of augmented training samples (masks, prompt boxes, points) and prints
dataset statistics; the logic lives in `sam_lightning.data.inspection`.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam_lightning.data.inspection import dataset_statistics, format_statistics, inspection_grid
from sam_lightning.errors import UserError, exit_on_user_error
from sam_lightning.viz import save_png


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    opts = cfg.inspect
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if opts.split not in datamodule.datasets:
        raise UserError(
            f"inspect.split={opts.split!r}; this dataset has {sorted(datamodule.datasets)}"
        )
    prompt = OmegaConf.to_container(cfg.prompt, resolve=True)
    for split, dataset in datamodule.datasets.items():
        stats = dataset_statistics(
            dataset, opts.max_stats_images, float(prompt.get("max_mask_fraction", 0.9))
        )
        print(format_statistics(stats, split))
    if datamodule.report is not None and not datamodule.report.ok:
        print(f"skipped (data.on_invalid=skip): {datamodule.report.skipped()}")
    grid = inspection_grid(
        datamodule.datasets[opts.split], prompt, opts.num_samples, opts.columns, opts.seed
    )
    print(save_png(grid, opts.output))


if __name__ == "__main__":
    main()
