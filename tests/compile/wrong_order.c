/* Including a system header before the implementation under strict C99:
   mpar.h must stop with an #error that says what to do (make compile-tests
   checks that this file fails, with that message). */
#include <stdio.h>
#define MPAR_IMPLEMENTATION
#include "mpar.h"
