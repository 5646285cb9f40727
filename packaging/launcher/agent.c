/* `mobility`, the frozen agent's launcher: runs _internal/PROGRAM (PyInstaller's one-dir program) through the
 * loader and libc bundled in _internal/, never the host's. See runtime.h. */
#include "runtime.h"

#include <libgen.h>

#ifndef PROGRAM
#define PROGRAM "mobility"
#endif
#define RUNTIME_SUBDIR "_internal"

int main(int argc, char **argv)
{
    char self[PATH_MAX], runtime[PATH_MAX];
    check_kernel();
    if (self_path(argc > 0 ? argv[0] : "", self) < 0)
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "cannot tell where this launcher is (no /proc, no path)");
    if (snprintf(runtime, sizeof(runtime), "%s/%s", dirname(self), RUNTIME_SUBDIR) >= (int)sizeof(runtime))
        fail(EXIT_ERROR, "RUNTIME-MISSING", FIX_RUNTIME, "path too long");
    exec_runtime(runtime, PROGRAM, argc, argv);
    return EXIT_ERROR;
}
