"""Extract layer saturation: a two-layer regression network with hidden sizes 3 and 32.

Each step trains on one batch and evaluates on another; ``add_saturations()`` then closes the
step as one "epoch", so ``regression/h{H}.csv`` gets one row per step with the train and eval
saturation of both layers. Run it as is::

    python examples/extract_saturation.py            # 100 steps per network, a few seconds
    python examples/extract_saturation.py --steps 2000 --out regression
"""

import argparse

import torch
from tqdm import trange

from delve import CheckLayerSat


class TwoLayerNet(torch.nn.Module):
    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.linear1 = torch.nn.Linear(d_in, hidden)
        self.linear2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.linear2(self.linear1(x).clamp(min=0))


def main(steps: int = 100, out: str = "regression", save_to: str = "csv") -> None:
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(1)
    for hidden in (3, 32):
        n, d_in, d_out = 64, 1000, 10
        x, y = torch.randn(n, d_in, device=device), torch.randn(n, d_out, device=device)
        x_test, y_test = torch.randn(n, d_in, device=device), torch.randn(n, d_out, device=device)

        model = TwoLayerNet(d_in, hidden, d_out).to(device)
        # Hand delve a list of layers (or the whole model: it then finds the layers itself).
        layers = [model.linear1, model.linear2]
        stats = CheckLayerSat(f"{out}/h{hidden}", save_to=save_to, modules=layers, stats=["lsat", "lsat_eval"])

        loss_fn = torch.nn.MSELoss(reduction="sum")
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        steps_iter = trange(steps, desc="steps", leave=True, position=0)
        steps_iter.write(f"{'Regression - TwoLayerNet - Hidden layer size ' + str(hidden):^80}")
        for _ in steps_iter:
            model.train()
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            model.eval()
            with torch.no_grad():
                loss_test = loss_fn(model(x_test), y_test)

            steps_iter.set_description(f"loss={loss.item():g}")
            stats.add_scalar("train-loss", loss.item())
            stats.add_scalar("test-loss", loss_test.item())
            stats.add_saturations()
        stats.close()
        steps_iter.close()
        print(f"wrote {out}/h{hidden}.csv")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per network (default 100)")
    parser.add_argument("--out", default="regression", help="output folder (default: regression)")
    parser.add_argument("--save-to", default="csv", help="writer key, e.g. csv or plotcsv (default: csv)")
    args = parser.parse_args()
    main(args.steps, args.out, args.save_to)
