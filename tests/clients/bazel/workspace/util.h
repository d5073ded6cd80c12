#ifndef UTIL_H
#define UTIL_H
int triangle(int n);
#endif
