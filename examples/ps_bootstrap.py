"""Start one process of a ps-lite job under any launcher (torchrun, mpirun, Slurm, Kubernetes).

Every process of the job runs ``python ps_bootstrap.py python train.py ...``:
the launcher's process index becomes a role (index 0 the scheduler, the next
``num_servers`` the servers, the rest workers), and the process becomes that
role with its ``DMLC_*`` environment. Workers run the command given; the
scheduler and servers run a fresh Python that only imports MXNet, which
serves the job until it ends.
"""

import os
import sys

from parallel_exec.dist import role_environment, role_of_process

num_servers = 1
num_workers = int(os.environ["WORLD_SIZE"]) - 1 - num_servers
index = int(os.environ["RANK"])  # Slurm: SLURM_PROCID; Open MPI: OMPI_COMM_WORLD_RANK
role, _ = role_of_process(index, num_workers=num_workers, num_servers=num_servers)
env = role_environment(
    role,
    num_workers=num_workers,
    num_servers=num_servers,
    scheduler_host=os.environ["MASTER_ADDR"],
    scheduler_port=int(os.environ["MASTER_PORT"]) + 1,  # MASTER_PORT itself is torchrun's
    node_host=os.environ.get("NODE_IP"),  # this machine's address; None: MASTER_ADDR (one machine)
)
command = sys.argv[1:] if role == "worker" else [sys.executable, "-c", "import mxnet"]
os.execvpe(command[0], command, {**os.environ, **env})
