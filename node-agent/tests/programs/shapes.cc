// A C++ program for the symbolization oracle: namespaces, templates, virtual calls,
// lambdas and inlining at -O2.
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

namespace geometry {
struct Shape {
    virtual ~Shape() = default;
    virtual double area() const = 0;
};
struct Rect : Shape {
    double w, h;
    Rect(double w, double h) : w(w), h(h) {}
    double area() const override { return w * h; }
};
template <typename T> T sum_areas(const std::vector<std::unique_ptr<Shape>> &shapes) {
    T total{};
    for (const auto &s : shapes) total += static_cast<T>(s->area());
    return total;
}
}  // namespace geometry

int main(int argc, char **argv) {
    std::vector<std::unique_ptr<geometry::Shape>> shapes;
    for (int i = 1; i < argc; i++) shapes.push_back(std::make_unique<geometry::Rect>(std::strlen(argv[i]), i));
    auto scale = [&](double f) { return geometry::sum_areas<double>(shapes) * f; };
    std::printf("%f %ld\n", scale(2.0), geometry::sum_areas<long>(shapes));
    return 0;
}
