#include <stdio.h>
#include "util.h"

int main(void) {
    printf("triangle(10) = %d\n", triangle(10));
    return 0;
}
