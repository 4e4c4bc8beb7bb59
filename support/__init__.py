"""What the stages share that is not a stage's concept: the command line and its one-line errors
(`harness`), timing and comparison (`timing`), weights and files (`weights`, `files`), the optional
prompt and video ends (`extras`), and stage 06/07's command line, benchmark and GPU verification
(`pipeline_cli`). Stages import it with plain imports (`from support import harness`); nothing here
imports a stage by name: where a helper needs a stage's own code, the stage passes itself in."""
