/* The header alone, implementation included: built as C99, C++ and with
   MPAR_STATIC by `make compile-tests`. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "mpar.h" /* a second include must be harmless */

int mpar_compile_test_entry(void);
int mpar_compile_test_entry(void) {
    mpar_desc desc;
    memset(&desc, 0, sizeof desc);
    return (int)(mpar_result_string(MPAR_SUCCESS)[0] == 'M');
}
