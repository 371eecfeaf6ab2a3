"""``python -m prefixlm.train summary WORKDIR``: one run's summary (steps, losses, evaluations)."""

import sys

from prefixlm.run import workdir

if len(sys.argv) != 3 or sys.argv[1] != "summary":
    sys.exit("usage: python -m prefixlm.train summary WORKDIR")
print(workdir.summarize(sys.argv[2]))
