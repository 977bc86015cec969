"""The engine: load a pipeline, turn concepts into token rows, compute an edit (closed form or trained), apply it
and restore bitwise, export it. It knows no model by name (a model's profile says what it is) and no method by
name (the registry says what each does); the wings above it (methods, evaluation, worlds, studio, cli) import
from it, never the other way round."""
