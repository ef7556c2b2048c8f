/* Declarations only, as every file but one includes it. */
#include "mpar.h"

int mpar_decl_test_entry(void);
int mpar_decl_test_entry(void) { return MPAR_VERSION_MAJOR + (int)sizeof(mpar_desc); }
